"""``python -m tf_custom_ops.build [--force] [--quiet]``: compile the ops now and print where."""

import sys

from tf_custom_ops._build import main

if __name__ == "__main__":
    sys.exit(main())
