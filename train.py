"""The main job from a checkout: `python train.py [overrides]` (an install has it as `quietstar-train`).

The training code is quietstar/train.py; its module docstring lists the common command lines.
"""

from quietstar.train import main

if __name__ == "__main__":
    main()
