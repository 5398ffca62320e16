class EngineError(Exception):
    """A problem the user can act on; the message is a plain sentence meant for them."""
