from cpvs.cli import main

main()
