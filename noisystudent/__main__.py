"""``python -m noisystudent COMMAND ...``: the same as the ``noisystudent`` console script."""

from .cli import main

if __name__ == "__main__":
    main()
