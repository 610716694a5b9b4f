"""Train an emotune LoRA adapter from a recipe.

    accelerate launch scripts/train.py recipes/calm.yaml [--key value ...]

A leading .yaml argument is the recipe; flags after it override its keys. All logic lives in
emotune.train, so this script stays a thin entry point.
"""

import sys

from emotune.train import main

if __name__ == "__main__":
    sys.exit(main())
