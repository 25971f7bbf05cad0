"""Model folders through ComfyUI's ``folder_paths``: the pack's own ones registered, lists and paths."""
import os

from ..common.folders import PACK_FOLDERS


def _folder_paths():
    try:
        import folder_paths
    except ImportError:  # outside ComfyUI (schema checks, unit tests)
        return None
    return folder_paths


def register_model_folders():
    """Register the pack's folders; a folder the user configured (extra_model_paths.yaml, applied before packs
    load) keeps its paths first, we only append ``models/<name>``. No-op (False) outside ComfyUI."""
    fp = _folder_paths()
    if fp is None:
        return False
    for name, exts in PACK_FOLDERS.items():
        default = os.path.join(fp.models_dir, name)
        existing = fp.folder_names_and_paths.get(name)
        if existing is None:
            fp.folder_names_and_paths[name] = ([default], set(exts))
        elif default not in existing[0]:
            existing[0].append(default)  # keep the user's paths first and their extension set as it is
    return True


def files(folder):
    """File names ComfyUI lists in a model folder ([] outside ComfyUI or for an unknown folder)."""
    fp = _folder_paths()
    if fp is None:
        return []
    try:
        return list(fp.get_filename_list(folder))
    except Exception:  # folder not registered
        return []


def paths(folder):
    """The configured paths of a model folder ([] outside ComfyUI)."""
    fp = _folder_paths()
    if fp is None:
        return []
    try:
        return list(fp.get_folder_paths(folder))
    except Exception:
        return []


def full_path(folder, name):
    """Full path of ``name`` in a model folder, or None."""
    fp = _folder_paths()
    return fp.get_full_path(folder, name) if fp is not None and name else None


def first_path(folder):
    """The first configured path of a model folder (created if missing), for messages and for writing."""
    found = paths(folder)
    if not found:
        raise RuntimeError(f"Atelier: ComfyUI has no '{folder}' model folder registered")
    os.makedirs(found[0], exist_ok=True)
    return found[0]


def subfolders(folder, has_file=None):
    """{name: path} of the sub-folders in a model folder's paths (first path wins), optionally only those
    holding ``has_file`` (e.g. "config.json" for Hugging Face model folders)."""
    found = {}
    for root in paths(folder):
        if not os.path.isdir(root):
            continue
        for name in sorted(os.listdir(root)):
            path = os.path.join(root, name)
            if name in found or not os.path.isdir(path):
                continue
            if has_file is None or os.path.isfile(os.path.join(path, has_file)):
                found[name] = path
    return found
