"""`python -m devtools.bench ...`: see the package's docstring."""
from . import main

raise SystemExit(main())
