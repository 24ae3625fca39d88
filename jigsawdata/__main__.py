"""``python -m jigsawdata``: the ``jigsawdata`` command, for ``torchrun`` and environments without the script."""

from jigsawdata.cli import main

if __name__ == "__main__":
    main()
