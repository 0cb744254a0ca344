"""Registers mmhub's built-in encoders (through the same hook a third-party plugin uses).

Each is registered by reference (``module:Class``) under its name: discovering the plugin imports none of
the encoders' modules (torch, transformers' model code, timm, open_clip); a module loads when a spec uses it.
"""

from mmhub.hookspecs import hookimpl

ENCODERS = (
    ("timm", "mmhub.encoders.timm_encoder:TimmEncoder"),
    ("open_clip", "mmhub.encoders.open_clip_encoder:OpenClipEncoder"),
    ("whisper", "mmhub.encoders.whisper_encoder:WhisperAudioEncoder"),
    ("hf_audio", "mmhub.encoders.hf_audio_encoder:HFAudioEncoder"),
    ("hf_vision", "mmhub.encoders.hf_vision_encoder:HFVisionEncoder"),
    ("video", "mmhub.encoders.video_encoder:VideoEncoder"),
    ("pointnet", "mmhub.encoders.point_encoder:PointEncoder"),
    ("point_bert", "mmhub.encoders.point_bert:PointBertEncoder"),
    ("imagebind", "mmhub.encoders.imagebind:ImageBindEncoder"),
    ("mllama_vision", "mmhub.encoders.mllama_vision:MllamaVisionEncoder"),
    ("qwen2_vl_vision", "mmhub.encoders.qwen2_vl_vision:Qwen2VLVisionEncoder"),
    ("anyres", "mmhub.encoders.anyres:AnyResEncoder"),
    ("eva2_clip", "mmhub.encoders.eva2_clip:Eva2ClipEncoder"),
    ("qwen_vl_vit", "mmhub.encoders.qwen_vl_vit:QwenVLViTEncoder"),
)


@hookimpl
def register_encoders(register):
    for name, ref in ENCODERS:
        register(ref, name=name)
