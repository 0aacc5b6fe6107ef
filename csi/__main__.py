from secretfs.csi.cli import main

raise SystemExit(main())
