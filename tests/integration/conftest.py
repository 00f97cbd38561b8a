"""The integration tests' process: torch and transformers imported before any test.

pytester's in-process sessions drop, when their test ends, every module first imported during
it; torch (and transformers over it) cannot be imported a second time in one process. Imported
here, they are already there before any such session, whatever order the tests run in. (Not in
tests/conftest.py: collecting the gate's cases must import neither.)
"""

import torch  # noqa: F401
import transformers  # noqa: F401
