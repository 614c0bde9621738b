"""What the book's pages and exercises use: exercise checks, shared figures, source on the page.

- :mod:`.exercises`: checkers for the student notebooks in ``exercises/``;
- :mod:`.handouts`: the student notebooks generated from the teacher's versions in ``exercises/source/``;
- :mod:`.grading`: a folder of submitted notebooks graded in one command;
- :mod:`.plotting`: one colour per method in every chapter;
- :mod:`.source`: a function's or class's source, highlighted, taken from the package.

The top of the import order: it may use every other part of the package.
"""
