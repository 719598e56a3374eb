"""Training algorithms, one module per family; see :mod:`mpidl.algorithms.base`.

Importing this package imports no family: :data:`MODULES` maps each built-in
algorithm name to the module that registers it with
:func:`mpidl.config.register_algorithm`, and :func:`mpidl.config.algorithm_registry`
imports that module the first time the name is asked for.  So a NEXT run on a
convex model never imports the torch families, and ``mpidl.config`` and the
family modules do not import each other in a circle.
"""

MODULES = {
    "cdsgd": "mpidl.algorithms.cdsgd",
    "cdmsgd": "mpidl.algorithms.cdsgd",
    "centralized": "mpidl.algorithms.cdsgd",
    "fedavg": "mpidl.algorithms.cdsgd",
    "next": "mpidl.algorithms.next",
    "lsgd": "mpidl.algorithms.lsgd",
    "easgd": "mpidl.algorithms.lsgd",
    "fdg": "mpidl.algorithms.fdg_grid",
    "pdadmm": "mpidl.algorithms.pdadmm_layout",
    "pdadmm-q": "mpidl.algorithms.pdadmm_layout",
}
"""Built-in algorithm name -> the module whose import registers it."""
