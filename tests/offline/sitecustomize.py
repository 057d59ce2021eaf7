"""Offline stand-in for deepinv's example images, for deepinv's own demos run unchanged (tests/test_deepinv_demos.py).

Put on ``PYTHONPATH``, Python imports this at start-up; when ``deepinv.utils.demo`` is first
imported its downloader is replaced by one returning scikit-image's astronaut (512², RGB) as a
PNG: the tests have no network, the demos download their pictures. Nothing else changes.
"""
import importlib.abc
import importlib.util
import sys


class _OfflineImages(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "deepinv.utils.demo":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)

            def offline(url, *args, **kwargs):
                import io

                from PIL import Image
                from skimage import data

                buf = io.BytesIO()
                Image.fromarray(data.astronaut()).save(buf, format="PNG")
                buf.seek(0)
                return buf

            module._load_url = offline

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _OfflineImages())
