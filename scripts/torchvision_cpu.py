"""Lets PyPI's torchvision (a CUDA build) import beside CPU torch, in every process of the CPU venv.

There is no CPU build of torchvision on PyPI, and the CUDA build's C++ library cannot load on CPU
torch. Its Python part then fails at import, in torchvision/_meta_registrations.py, which registers
fake kernels for the C++ ops `torchvision::nms` and `torchvision::qnms`: "operator torchvision::nms
does not exist". Qwen2.5-VL needs torchvision (transformers' processor, vLLM's model module).
Declaring the two op schemas before that import is enough: the Python part imports, and nothing on
this project's path calls the ops. No installed file is edited.

scripts/setup_venv.sh (CPU venv only) copies this file into site-packages and loads it from a .pth
file, so it acts in every Python process of the venv, including the ones vLLM starts to inspect model
classes. It does nothing until the first `import torchvision`, and nothing at all on CUDA torch.
"""
import importlib.abc
import sys

_libraries = []  # the declared schemas live as long as their Library object


class _DeclareTorchvisionOps(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)  # once; the ordinary finders then import torchvision itself
        import torch
        if torch.version.cuda is None:
            library = torch.library.Library("torchvision", "FRAGMENT")
            library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _libraries.append(library)
        return None


sys.meta_path.insert(0, _DeclareTorchvisionOps())
