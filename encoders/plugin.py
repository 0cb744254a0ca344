"""Registers mmhub's built-in encoders (through the same hook a third-party plugin uses)."""

from mmhub.encoders.hf_audio_encoder import HFAudioEncoder
from mmhub.encoders.open_clip_encoder import OpenClipEncoder
from mmhub.encoders.timm_encoder import TimmEncoder
from mmhub.encoders.whisper_encoder import WhisperAudioEncoder
from mmhub.hookspecs import hookimpl


@hookimpl
def register_encoders(register):
    register(TimmEncoder)
    register(OpenClipEncoder)
    register(WhisperAudioEncoder)
    register(HFAudioEncoder)
