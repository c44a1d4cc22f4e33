"""Evaluation: image metrics, profile retrieval (NSC/NSCB, targets, mAP), CPcor, toxicity, FID and the report."""
