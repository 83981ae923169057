import sys

from .cli import main
from .launch import exit_recorder

with exit_recorder():  # a launcher that is not our parent learns how we ended (mmnb.launch)
    sys.exit(main())
