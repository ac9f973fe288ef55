import sys

from avsync.data.synth.generate import main

sys.exit(main())
