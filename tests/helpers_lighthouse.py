"""A torchft Lighthouse in its own process that starts in a fraction of a second (tests/test_elastic_faults.py):
    python tests/helpers_lighthouse.py --bind [::]:PORT --min_replicas 1 ...   (torchft_lighthouse's flags)
torchft's own torchft_lighthouse imports the whole torchft package (and torch) first, seconds on a busy machine;
this loads only the native module. It must run as a script path: the Lighthouse parses the process's own argv."""

import glob
import importlib.util
import os

package = importlib.util.find_spec("torchft").submodule_search_locations[0]
spec = importlib.util.spec_from_file_location("_torchft", glob.glob(os.path.join(package, "_torchft*.so"))[0])
native = importlib.util.module_from_spec(spec)
spec.loader.exec_module(native)
native.lighthouse_main()
