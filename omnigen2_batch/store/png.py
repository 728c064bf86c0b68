"""PNG text chunks: how an output was made and judged, readable by other tools."""
from __future__ import annotations

import io
import json
from typing import Any

from PIL import Image, PngImagePlugin

from .. import __version__
from ..jobs import Attempt, Job

TINY_NOTE = "made by the random-weight tiny model: this image is noise, not a real OmniGen2 output"
CHUNK = "omnigen2_batch"  # the text chunk with our JSON record


def encode_png(image: Image.Image, job: Job, attempt: Attempt, status: str) -> bytes:
    """The PNG bytes of an output, with text chunks that say how it was made and judged."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", a1111_parameters(job, attempt))
    info.add_text(CHUNK, json.dumps(_chunk_record(job, attempt, status), ensure_ascii=False,
                                    sort_keys=True))
    info.add_text("Software", f"omnigen2-batch {__version__}")
    if is_tiny(job.model):
        info.add_text("Comment", TINY_NOTE)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def chunk_job_id(data: bytes) -> str | None:
    """The job id our text chunk names, or None for a PNG we did not write (or not a PNG)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return json.loads(image.text[CHUNK])["job_id"]
    except Exception:  # any unreadable or foreign file is simply not ours
        return None


def a1111_parameters(job: Job, attempt: Attempt) -> str:
    """The `parameters` text other tools (A1111, ComfyUI readers, civitai) understand."""
    params = attempt.params or {}
    lines = [job.prompt]
    if job.negative_prompt:
        lines.append(f"Negative prompt: {job.negative_prompt}")
    width, height = params.get("width", job.width), params.get("height", job.height)
    low, high = params.get("cfg_range", job.cfg_range)
    fields = [
        ("Steps", params.get("steps", job.steps)),
        ("Sampler", params.get("scheduler", job.scheduler)),
        ("CFG scale", params.get("text_guidance", job.text_guidance)),
        ("Image CFG scale", params.get("image_guidance", job.image_guidance)),
        ("CFG range", f"{low}-{high}"),
        ("Seed", attempt.seed),
        ("Size", f"{width}x{height}"),
        ("Model", job.model),
        ("Strategy", attempt.strategy),
    ]
    if attempt.scores:
        fields.append(("Scores", " ".join(f"{k}={v:.4f}" for k, v in sorted(attempt.scores.items()))))
    if is_tiny(job.model):
        fields.append(("Note", TINY_NOTE))
    lines.append(", ".join(f"{key}: {value}" for key, value in fields))
    return "\n".join(lines)


def _chunk_record(job: Job, attempt: Attempt, status: str) -> dict[str, Any]:
    record = {"job_id": job.id, "section": job.section, "name": job.name, "status": status,
              "lang": job.lang, "identity": job.identity(), "attempt": attempt.record(),
              "version": __version__}
    if is_tiny(job.model):
        record["note"] = TINY_NOTE
    return record


def is_tiny(model: str) -> bool:
    return model == "tiny"
