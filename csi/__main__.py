import sys

sys.dont_write_bytecode = True  # the driver writes nothing to disk, bytecode caches included

from secretfs.csi.cli import main  # noqa: E402

raise SystemExit(main())
