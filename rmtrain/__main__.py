"""`python -m rmtrain`, `accelerate launch -m rmtrain`, and `accelerate launch rmtrain` (runs this file)."""

import os
import sys

if not __package__:
    # Run as a script (`python rmtrain`, which is what `accelerate launch rmtrain ...` does): Python put this
    # folder first on sys.path, where data.py, model.py, ... would shadow libraries of the same name.
    # Import the package from its parent folder instead.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    sys.path.insert(0, os.path.dirname(_here))

from rmtrain.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
