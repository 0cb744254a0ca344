"""Built-in generators (installed as ``mmhub.generators``): diffusers pipelines that turn an output
projector's conditioning into media, registered through the ``register_generators`` hook."""
