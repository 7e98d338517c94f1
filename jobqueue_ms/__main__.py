"""``python -m jobqueue_ms ...`` is the same as the ``jobqueue-ms`` command."""

from .cli import main

if __name__ == "__main__":
    main()
