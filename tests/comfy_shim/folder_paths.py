"""Stand-in for ComfyUI's ``folder_paths``: model folders under ``models_dir``, input/output dirs.

Tests point ``models_dir`` and the input/output directories at temporary folders with ``reset``.
"""
import os

models_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_models")
_input_dir = None
_output_dir = None

supported_pt_extensions = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
folder_names_and_paths: dict[str, tuple[list[str], set[str]]] = {}


def reset(root: str) -> None:
    """Fresh folders under ``root`` (models/, input/, output/) and no registered model folders."""
    global models_dir, _input_dir, _output_dir
    models_dir = os.path.join(root, "models")
    _input_dir = os.path.join(root, "input")
    _output_dir = os.path.join(root, "output")
    for d in (models_dir, _input_dir, _output_dir):
        os.makedirs(d, exist_ok=True)
    folder_names_and_paths.clear()


def add_model_folder_path(folder_name: str, full_folder_path: str, is_default: bool = False) -> None:
    if folder_name not in folder_names_and_paths:
        folder_names_and_paths[folder_name] = ([full_folder_path], set())
        return
    paths = folder_names_and_paths[folder_name][0]
    if full_folder_path in paths:
        if is_default:
            paths.remove(full_folder_path)
            paths.insert(0, full_folder_path)
    elif is_default:
        paths.insert(0, full_folder_path)
    else:
        paths.append(full_folder_path)


def get_folder_paths(folder_name: str) -> list[str]:
    return list(folder_names_and_paths[folder_name][0])


def get_filename_list(folder_name: str) -> list[str]:
    paths, exts = folder_names_and_paths[folder_name]
    found = set()
    for root in paths:
        if not os.path.isdir(root):
            continue
        for dirpath, _dirs, files in os.walk(root, followlinks=True):
            for f in files:
                if not exts or os.path.splitext(f)[1].lower() in exts:
                    found.add(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/"))
    return sorted(found)


def get_full_path(folder_name: str, filename: str):
    if folder_name not in folder_names_and_paths:
        return None
    filename = os.path.relpath(os.path.join("/", filename), "/")
    for root in folder_names_and_paths[folder_name][0]:
        full = os.path.join(root, filename)
        if os.path.isfile(full):
            return full
    return None


def get_full_path_or_raise(folder_name: str, filename: str) -> str:
    full = get_full_path(folder_name, filename)
    if full is None:
        raise FileNotFoundError(f"Model in folder '{folder_name}' with filename '{filename}' not found.")
    return full


def get_input_directory() -> str:
    return _input_dir


def get_output_directory() -> str:
    return _output_dir


def get_input_subfolders() -> list[str]:
    if not _input_dir or not os.path.isdir(_input_dir):
        return []
    return sorted(d for d in os.listdir(_input_dir) if os.path.isdir(os.path.join(_input_dir, d)))
