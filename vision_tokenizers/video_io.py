"""Video files in and out with PyAV: decode a clip to frames, fit it to the trained size, write .mp4 and GIF.
Used by the data sources (train/video/data.py) and the generation script; no training code here."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


# ---- decoding -------------------------------------------------------------------------
def fit_clip(frames: np.ndarray, n_frames: int, size: int, channels: int, stride: int = 1,
             where: str = "clip") -> torch.Tensor:
    """RGB frames [T, H, W, 3] uint8 -> [C, n_frames, size, size] in [-1, 1] (sample, resize, crop)."""
    if len(frames) < 1 + (n_frames - 1) * stride:
        raise ValueError(f"{where}: {len(frames)} frames, need {1 + (n_frames - 1) * stride} "
                         f"({n_frames} at stride {stride})")
    x = torch.from_numpy(np.ascontiguousarray(frames[: 1 + (n_frames - 1) * stride: stride])).float() / 255.0
    x = x.permute(0, 3, 1, 2)  # [T, 3, H, W]
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[:, :, top:top + size, left:left + size]
    if channels == 1:
        x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return (x.permute(1, 0, 2, 3).clamp(0, 1) * 2 - 1).contiguous()


def decode_frames(source, where: str, max_frames: int | None = None) -> np.ndarray:
    """All (or the first `max_frames`) video frames of a file path or bytes, as RGB [T, H, W, 3] uint8 (PyAV)."""
    import av

    try:
        with av.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source)) as c:
            out = []
            for fr in c.decode(video=0):
                out.append(fr.to_ndarray(format="rgb24"))
                if max_frames is not None and len(out) >= max_frames:
                    break
    except Exception as e:  # PyAV raises many error types for broken files
        raise ValueError(f"{where}: cannot decode video ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not out:
        raise ValueError(f"{where}: no video frames")
    return np.stack(out)


def write_mp4(video: torch.Tensor, path: str | Path, fps: int = 8) -> None:
    """video [C, T, H, W] in [-1, 1] -> H.264 (or MPEG-4 when libx264 is missing) .mp4 via PyAV."""
    import av

    arr = to_uint8_frames(video)  # [T, H, W, 3]
    with av.open(str(path), mode="w", format="mp4") as c:
        try:
            s = c.add_stream("libx264", rate=fps)
        except Exception:
            s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = arr.shape[2], arr.shape[1], "yuv420p"
        for f in arr:
            for pkt in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """video [C, T, H, W] in [-1, 1] -> [T, H, W, 3] uint8."""
    frames = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte()
    if frames.shape[0] == 1:
        frames = frames.expand(3, -1, -1, -1)
    return frames.permute(1, 2, 3, 0).cpu().numpy()


def write_gif(video: torch.Tensor, path: str | Path, fps: int = 8) -> None:
    """Animated GIF (looping) of video [C, T, H, W] in [-1, 1]."""
    frames = [Image.fromarray(f) for f in to_uint8_frames(video)]
    frames[0].save(str(path), format="GIF", save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)


def frame_strip(video: torch.Tensor) -> torch.Tensor:
    """video [C, T, H, W] -> one image [C, H, T*W] (the frames side by side)."""
    return torch.cat(list(video.unbind(1)), dim=-1)
