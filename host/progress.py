"""The pack's progress protocol (common.progress) on ComfyUI: a ProgressBar on the node, the user's interrupt
raised by ``check_interrupt``, and text shown under the node."""
from ..common.progress import Progress


def check_interrupt():
    """Raise ComfyUI's interrupt exception when the user pressed Cancel (no-op outside ComfyUI)."""
    try:
        import comfy.model_management as mm
    except ImportError:
        return
    mm.throw_exception_if_processing_interrupted()


class ComfyProgress(Progress):
    """Progress on the running node's bar; ``preview`` images (PIL or uint8 arrays) are shown on the node."""

    def __init__(self, total=1, node_id=None):
        try:
            from comfy.utils import ProgressBar
        except ImportError:  # called outside ComfyUI (tests, scripts)
            self._bar = None
        else:
            self._bar = ProgressBar(max(1, int(total)), node_id=node_id)

    def update(self, done, total, preview=None):
        if self._bar is None:
            return
        if preview is not None:
            preview = ("JPEG", _pil(preview), 512)
        self._bar.update_absolute(done, max(1, int(total)), preview)

    def check_interrupt(self):
        check_interrupt()


def _pil(image):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    import numpy as np

    return Image.fromarray(np.asarray(image, dtype=np.uint8))


def show_text(text, node_id):
    """Text under the node while it runs (ComfyUI's progress text); silently skipped without a server."""
    if node_id is None:
        return
    try:
        from server import PromptServer

        PromptServer.instance.send_progress_text(text, node_id)
    except Exception:  # no server in-process / an older ComfyUI: the node's outputs still carry the text
        pass
