"""What daskrecon knows about deepinv operators: their chunk-wise forms and their faster substitutes.

- :mod:`.chunkwise`: local operators (blurs, down-sampling, inpainting...) as chunk-by-chunk
  Dask graphs with exact halos (``local_form``, a registry users extend);
- :mod:`.slicewise`: 2-D operators on every slice of a volume (CT, multi-slice MRI), slab by
  slab with no halo (``slicewise``);
- faster equivalents evaluated on the workers (:class:`FFTConvolution`, :func:`specialize`,
  :func:`original`) live in :mod:`daskrecon.tasks.substitutes`, since they run inside tasks,
  and are re-exported here.

May import: :mod:`daskrecon.errors`, :mod:`daskrecon.planning`, :mod:`daskrecon.tasks`,
:mod:`daskrecon.runtime`.
"""

from daskrecon.operators.chunkwise import LocalOperator, local_form
from daskrecon.operators.slicewise import Slicewise, SlicewiseOperator, slicewise
from daskrecon.tasks.substitutes import FFTConvolution, original, specialize

__all__ = ["FFTConvolution", "LocalOperator", "Slicewise", "SlicewiseOperator", "local_form", "original", "slicewise",
           "specialize"]
