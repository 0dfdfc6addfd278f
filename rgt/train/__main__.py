"""`python -m rgt.train [-opt FILE.yml] [--set key.path=value ...]`: see rgt/train/cli.py."""

from rgt.train.cli import main

if __name__ == "__main__":
    main()
