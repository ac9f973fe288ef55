import sys

from avsync.synth.generate import main

sys.exit(main())
