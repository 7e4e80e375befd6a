import os
import shutil
import sys

from pipeline.train.loop import use_cpu_deepspeed


def test_cpu_deepspeed_builds_its_ops_with_the_ninja_installed_beside_it(monkeypatch):
    bin_dir = os.path.dirname(sys.executable)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/bin", bin_dir, "/bin"]))
    use_cpu_deepspeed()
    assert os.environ["DS_ACCELERATOR"] == "cpu"
    assert os.environ["PATH"].split(os.pathsep) == [bin_dir, "/usr/bin", "/bin"]  # moved first, not duplicated
    assert os.path.dirname(shutil.which("ninja")) == bin_dir
