"""Distillation of a thinking teacher into a plain student (distill.teacher=<run>): the student, which never
thinks, is trained towards the teacher's with-thought predictions.

  distill.py  DistillConfig, the student (Distiller) and its registry entry (`build_student`, `check`)
  recipe.py   experiment=distill_reasoning: the student stage and the held-out scores of base, teacher, student
"""
