"""A simulated GPU for the device tests: CPU tensors marked as on "cuda:0", with real values."""

import torch
from torch.overrides import TorchFunctionMode


class SimulatedGPU(TorchFunctionMode):
    """A second device with real numbers: tensors on the simulated "cuda:0" are CPU tensors
    marked as on the GPU.

    Fake tensors cannot read a value (a jitter, a mask's sum), and the closed-form baselines read
    several. Here every value is real. A marked tensor reports ``device`` cuda:0 and its results
    stay marked; ``.to("cuda")`` and factories given a CUDA device make marked tensors, ``.cpu()``
    and ``.to("cpu")`` unmarked ones; an op that meets a marked tensor and an unmarked one with
    dimensions raises the device-mismatch error a GPU would. As on a GPU, copies (``copy_``,
    item assignment) cross devices, a CPU index may index a marked tensor, and 0-dim CPU tensors
    mix with marked ones.
    """

    CUDA = torch.device("cuda", 0)
    CROSSING = {"__getitem__", "__setitem__", "copy_", "to", "cpu", "_has_compatible_shallow_copy_type"}

    def __enter__(self):
        # nn.Parameter(t) makes its tensor without a torch function call: carry the mark over.
        self._parameter_new = vars(torch.nn.Parameter)["__new__"]
        make = self._parameter_new.__func__

        def parameter(cls, data=None, requires_grad=True):
            made = make(cls, data, requires_grad)
            if data is not None and self.on_gpu(data):
                made._simulated_gpu = True
            return made

        torch.nn.Parameter.__new__ = staticmethod(parameter)
        # The machine reports one CUDA device, as a machine with one GPU would.
        self._cuda_queries = torch.cuda.is_available, torch.cuda.device_count
        torch.cuda.is_available, torch.cuda.device_count = (lambda: True), (lambda: 1)
        return super().__enter__()

    def __exit__(self, *exc):
        torch.nn.Parameter.__new__ = self._parameter_new
        torch.cuda.is_available, torch.cuda.device_count = self._cuda_queries
        return super().__exit__(*exc)

    @staticmethod
    def put(t: torch.Tensor) -> torch.Tensor:
        t = t.view_as(t)  # a new tensor object: the caller's stays on the host
        t._simulated_gpu = True
        return t

    @staticmethod
    def on_gpu(t) -> bool:
        return getattr(t, "_simulated_gpu", False)

    @staticmethod
    def _device(value):
        """(value with a CUDA device replaced by the CPU, whether it was one)."""
        if not isinstance(value, (torch.device, str)):
            return value, False
        try:
            device = torch.device(value) if isinstance(value, str) else value
        except RuntimeError:  # a string that names no device
            return value, False
        return (torch.device("cpu"), True) if device.type == "cuda" else (value, False)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if func is torch.device or name == "_parse_to":  # naming a device is not putting anything on it
            return func(*args, **kwargs)
        if name == "__get__" and getattr(func, "__self__", None) is torch.Tensor.device:
            return self.CUDA if self.on_gpu(args[0]) else func(*args, **kwargs)
        if name == "__set__" and getattr(func, "__self__", None) is torch.Tensor.data:
            # Module.to(device) swaps each parameter's data: the parameter moves with it.
            func(*args, **kwargs)
            args[0]._simulated_gpu = self.on_gpu(args[1])
            return None
        to_gpu = False
        args = list(args)
        for i, a in enumerate(args):
            args[i], hit = self._device(a)
            to_gpu |= hit
        if "device" in kwargs:
            kwargs["device"], hit = self._device(kwargs["device"])
            to_gpu |= hit
        leaves = [x for x in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        marked = [self.on_gpu(x) for x in leaves]
        if any(marked) and name not in self.CROSSING:
            if any(not m and x.dim() > 0 for x, m in zip(leaves, marked, strict=True)):
                raise RuntimeError(f"Expected all tensors to be on the same device ({name} on the simulated GPU "
                                   "met a CPU tensor)")
        out = func(*args, **kwargs)
        if name in ("__setitem__", "copy_"):
            return out
        if name in ("to", "cpu"):
            to_host = name == "cpu" or (not to_gpu and any(
                isinstance(a, (str, torch.device)) and str(a).startswith("cpu") for a in (*args[1:], kwargs.get("device"))))
            if to_gpu or to_host:
                out = out.view_as(out)  # .to may return its input: the result is a new tensor either way
                if to_gpu:
                    out._simulated_gpu = True
                return out
        if to_gpu or any(marked):
            for x in torch.utils._pytree.tree_leaves(out):
                if isinstance(x, torch.Tensor):
                    x._simulated_gpu = True
        return out
