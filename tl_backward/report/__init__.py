"""The main job as one function: a prompt in, a text summary and one offline HTML page out.

- :mod:`.build`: :func:`build_report` runs the feature APIs on one prompt;
- :mod:`.result`: :class:`Report` and :class:`Prediction` (frozen data);
- :mod:`.text`: the summary the CLI prints; :mod:`.page`: the HTML page;
- :mod:`.progress`: :class:`Progress`, announcing slow steps.
"""

from .build import build_report, lower_case_helps
from .progress import Progress
from .result import Prediction, Report

__all__ = ["Prediction", "Progress", "Report", "build_report", "lower_case_helps"]
