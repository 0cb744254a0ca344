"""Registers mmhub's built-in encoders (through the same hook a third-party plugin uses)."""

from mmhub.encoders.anyres import AnyResEncoder
from mmhub.encoders.eva2_clip import Eva2ClipEncoder
from mmhub.encoders.hf_audio_encoder import HFAudioEncoder
from mmhub.encoders.hf_vision_encoder import HFVisionEncoder
from mmhub.encoders.imagebind import ImageBindEncoder
from mmhub.encoders.mllama_vision import MllamaVisionEncoder
from mmhub.encoders.open_clip_encoder import OpenClipEncoder
from mmhub.encoders.point_bert import PointBertEncoder
from mmhub.encoders.point_encoder import PointEncoder
from mmhub.encoders.qwen2_vl_vision import Qwen2VLVisionEncoder
from mmhub.encoders.qwen_vl_vit import QwenVLViTEncoder
from mmhub.encoders.timm_encoder import TimmEncoder
from mmhub.encoders.video_encoder import VideoEncoder
from mmhub.encoders.whisper_encoder import WhisperAudioEncoder
from mmhub.hookspecs import hookimpl


@hookimpl
def register_encoders(register):
    register(TimmEncoder)
    register(OpenClipEncoder)
    register(WhisperAudioEncoder)
    register(HFAudioEncoder)
    register(HFVisionEncoder)
    register(VideoEncoder)
    register(PointEncoder)
    register(PointBertEncoder)
    register(ImageBindEncoder)
    register(MllamaVisionEncoder)
    register(Qwen2VLVisionEncoder)
    register(AnyResEncoder)
    register(Eva2ClipEncoder)
    register(QwenVLViTEncoder)
