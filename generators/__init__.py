"""Built-in generators (installed as ``mmhub.generators``). None ship yet: the output side of
the zoo (output projectors + diffusers generators) is not implemented, and specs that
declare one are rejected by validation with that message."""
