"""A minimal experiment file and a writer, shared by the bench tests."""

BASE = """
dataset = "fashion_mnist"
[[models]]
name = "m"
architecture = "small_cnn"
quantization = "stq"
options = { width = 4 }
[threat_models.linf]
epsilons = [0.05]
examples = 16
attacks = { fgsm = { type = "FGSM" } }
"""


def write(tmp_path, text):
    """Writes `text` as `tmp_path/e.toml` and returns its path."""
    path = tmp_path / "e.toml"
    path.write_text(text)
    return path
