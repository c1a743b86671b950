# Copyright 2020-2026 The HuggingFace Team. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
# --------------------------------------------------------------------------------------------------
# lenkernels: a shim for the vendored TRL tests' `from .testing_utils import TrlTestCase`.
# `TrlTestCase` is copied verbatim from TRL's tests/testing_utils.py at commit
# f2cd57710ae345ea6428ae95363267fcf38a3dc8 (github.com/huggingface/trl); the rest of that module
# (skip markers for optional packages the vendored tests do not use) is left out.
# --------------------------------------------------------------------------------------------------

import pytest


class TrlTestCase:
    @pytest.fixture(autouse=True)
    def set_tmp_dir(self, tmp_path):
        self.tmp_dir = str(tmp_path)
