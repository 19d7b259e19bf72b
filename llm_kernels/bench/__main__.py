"""``python -m llm_kernels.bench ...`` = ``python -m llm_kernels bench ...``."""

from .driver import main

raise SystemExit(main())
