"""The growth engine: one controller that a user's own loop and ``esper train`` both drive.

Parts, each with ``state_dict``/``load_state_dict`` where it holds state: the catalog of what may
grow where, kernel supply (never blocks a step), seed execution (the only code that changes seed
modules and optimizer groups), verdicts, the governor, and the controller that composes them.
"""
