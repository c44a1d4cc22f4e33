"""Evaluations run during training: the evaluation layer hands a trainer a plain function,
so trainers never import evaluation code."""

from __future__ import annotations

import tempfile
from pathlib import Path


def moa_matching(moa_col: str = "Metadata_MOA", compound_col: str = "Metadata_Compound", batch_col: str = "Metadata_Batch",
                 negative_query: str | None = "Metadata_ControlType == 'negcon'"):
    """``evaluate(teacher, store, channels, device) -> {"nsc": .., "nscb": ..}`` for
    :func:`cpvs.train.dino.train_dino`: NSC (and NSCB when the store spans batches) of the
    teacher's well-level embeddings of the whole store."""
    from cpvs.embed.embedding import embed_store
    from cpvs.evaluate.suite import EvalConfig, evaluate_profiles
    from cpvs.tables import to_wells

    def evaluate(teacher, store, channels: list[str], device) -> dict:
        if moa_col not in store.table.columns:  # nothing to match without MOAs
            return {}
        emb = embed_store(store, teacher, channels, device)
        feats = [c for c in emb.fields.columns if c.startswith("Emb_")]
        wells = to_wells(emb.fields, feats, "median")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "wells.parquet"
            wells.to_parquet(path)
            has_batch = batch_col in wells.columns and wells[batch_col].nunique() > 1
            res = evaluate_profiles(EvalConfig(path, nsc=True, nscb=has_batch, moa_col=moa_col, compound_col=compound_col,
                                               batch_col=batch_col, negative_query=negative_query))
        out = {"nsc": res.results["nsc"].score}
        if "nscb" in res.results:
            out["nscb"] = res.results["nscb"].score
        return out

    return evaluate
