"""Registers tinylm's lm-evaluation-harness backend (tinylm.evals.harness) with lm-eval releases that do not
discover plugins through the `lm_eval.models` entry point (0.4.13 and older), so that `lm_eval --model tinylm`
works once tinylm is installed.

tinylm-lm-eval.pth imports this module at interpreter start (site.py runs the `import` lines of .pth files).
It only puts a finder first on sys.meta_path: when lm_eval.api.registry is first imported, the finder lets the
ordinary finders load it and then registers "tinylm" as a lazy "module:class" placeholder, so neither tinylm
nor torch is imported until lm-eval asks for the model. Nothing else is imported, and any failure leaves
lm-eval's import as it would have been.
"""

import sys

TARGET = "tinylm.evals.harness:TinylmLM"


class RegisterTinylm:
    """A meta-path finder that wraps the loading of lm_eval.api.registry, once."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):  # noqa: ANN001, ANN206 (the meta-path protocol)
        if name != "lm_eval.api.registry":
            return None
        sys.meta_path[:] = [f for f in sys.meta_path if f is not cls]
        try:
            import importlib.util

            spec = importlib.util.find_spec(name)  # the ordinary finders (this one is gone)
            run = spec.loader.exec_module
        except Exception:  # noqa: BLE001 (whatever went wrong, the ordinary import goes on)
            return None

        def exec_module(module):  # noqa: ANN001, ANN202
            run(module)
            try:
                if not hasattr(module, "load_plugins") and "tinylm" not in module.model_registry:
                    module.model_registry.register("tinylm", target=TARGET)
            except Exception:  # noqa: BLE001, S110 (an lm-eval whose registry differs: no tinylm backend)
                pass

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Put the finder first on sys.meta_path (before the ordinary path finder), unless lm-eval's registry is
    already imported or the finder is already there."""
    if "lm_eval.api.registry" not in sys.modules and RegisterTinylm not in sys.meta_path:
        sys.meta_path.insert(0, RegisterTinylm)


install()
