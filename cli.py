"""`python cli.py ...` is the same as `omnigen2-batch ...`."""
from omnigen2_batch.cli import main

if __name__ == "__main__":
    main()
