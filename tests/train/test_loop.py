import os
import shutil
import subprocess
import sys

from pipeline.train.engine import use_cpu_deepspeed


def test_cpu_deepspeed_builds_its_ops_with_the_ninja_installed_beside_it(monkeypatch):
    bin_dir = os.path.dirname(sys.executable)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/bin", bin_dir, "/bin"]))
    use_cpu_deepspeed()
    assert os.environ["DS_ACCELERATOR"] == "cpu"
    assert os.environ["PATH"].split(os.pathsep) == [bin_dir, "/usr/bin", "/bin"]  # moved first, not duplicated
    assert os.path.dirname(shutil.which("ninja")) == bin_dir


def test_the_driver_and_data_coordinators_do_not_import_torchvision():
    # a job's driver imports the launcher, and Ray Data's coordinator actors import the module of the decode
    # function when they unpickle the plan; the decode tasks, and mixup/cutmix, import torchvision where it is used
    code = ("import sys; import pipeline.train.launch, pipeline.train.resolved_job, pipeline.data.datasets; "
            "print(sorted(m for m in sys.modules if m.startswith('torchvision')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_loop_and_what_it_imports_import_no_ray():
    # the loop talks to Ray only through its context; tests/train/test_local_training.py runs it without Ray
    code = ("import sys; import pipeline.train.loop, pipeline.train.context, pipeline.data.local_stream; "
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
