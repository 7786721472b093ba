"""The PyTorch backend of kdpm2 (CPU, CUDA, MPS); torch is imported only when the backend is first used."""

from kdpm2core.hookspecs import hookimpl


def make_backend():
    from kdpm2_torch.backend import TorchBackend

    return TorchBackend()


@hookimpl
def register_backends(register):
    register("torch", make_backend, requires=("torch",))
