"The project's configuration stays honest: environment.yml, settings.ini, flags and versions agree."
import configparser, json, pathlib, re
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent

def _settings():
    cp = configparser.ConfigParser(); cp.read(ROOT / "settings.ini")
    return cp["DEFAULT"]

def _pip_list():
    env = yaml.safe_load(open(ROOT / "environment.yml"))
    assert env["name"] == "todre" and "channels" in env
    blocks = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(blocks) == 1
    return [str(r) for r in blocks[0]]

def test_environment_pins():
    pip = _pip_list()
    assert pip[0] == "torch==2.13.0", "torch must be installed first and pinned"
    for req in ["nbdev==2.4.14", "fastcore<2", "execnb<0.2", "-e ."]: assert req in pip
    for pkg in ["transformers", "datasets", "jupyterlab", "ipywidgets", "seaborn", "pytest", "hypothesis"]:
        assert any(r.split("=")[0].split("<")[0] == pkg for r in pip), pkg
    assert not any(r.startswith("torchvision") for r in pip), "torchvision breaks the image processors beside the CPU torch"

def test_every_notebook_flag_is_a_test_flag():
    flags = set(_settings()["tst_flags"].split())
    assert {"notest", "slow", "cuda", "hub"} <= flags
    known = {"export", "exporti", "exports", "hide", "default_exp", "eval:", "echo:", "output:", "code-fold:", "include:"}
    for nb in ROOT.glob("nbs/**/*.ipynb"):
        for cell in json.load(open(nb))["cells"]:
            if cell["cell_type"] != "code": continue
            for line in "".join(cell["source"]).splitlines():
                m = re.match(r"#\|\s*([\w:-]+)", line)
                if m and m.group(1) not in known:
                    assert m.group(1) in flags, f"{nb.name}: flag '#| {m.group(1)}' is not in settings.ini tst_flags"

def test_version_in_sync():
    import todre
    assert todre.__version__ == _settings()["version"]

def test_import_is_light():
    import subprocess, sys
    code = "import sys, todre; print(int('transformers' in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "0", "import todre must not import transformers"
