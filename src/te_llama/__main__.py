import sys

from te_llama.cli import main

sys.exit(main())
