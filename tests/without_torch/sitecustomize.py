"""On PYTHONPATH, makes torch unimportable in that interpreter: the serving install (`pip install charlstm`,
no extras) in the test environment, which has torch for everything else."""

import sys


class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r} (the serving install has no torch)", name="torch")
        return None


sys.meta_path.insert(0, _NoTorch())
