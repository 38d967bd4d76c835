"""``python -m gradprobe``: the same as the ``gradprobe`` command."""

from gradprobe.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
