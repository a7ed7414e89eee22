"""The hand-made bugs each guard exists to catch: put each in, one at a time, run its named
test, and say whether the test failed (it must). The tree is restored after each.

    python tools/handmade.py            # every kind
    python tools/handmade.py 4a 6       # some

A kind whose text is no longer in its module (the code moved or changed) is reported as
"not applied": update its line here with the code, not the test.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# kind: (what, module, the line as it is, the line with the bug, the test that must fail)
BUGS: dict[str, tuple[str, str, str, str, str]] = {
    # issue 37: the device, collective and config code
    "37.1": ("a stop inside a fused chunk reports one step past the last applied", "distributed_maml/execution/devicesteps.py",
             "return unlogged[len(got_loss) - 1]", "return unlogged[len(got_loss)]",
             "tests/test_devicesteps.py::test_a_stop_inside_a_fused_chunk_reports_the_last_step_applied"),
    "37.2": ("the finiteness check reads the gradient only", "distributed_maml/execution/masked.py",
             "finite = torch.isfinite(mean).all() & torch.isfinite(loss)", "finite = torch.isfinite(mean).all()",
             "tests/test_devicesteps.py::test_a_finite_gradient_with_a_non_finite_loss_is_never_applied"),
    "37.3": ("collective mode reports every rank's compute time as rank 0's", "distributed_maml/execution/collectivesteps.py",
             "per_rank[r][j]]", "per_rank[0][j]]",
             "tests/test_collectivesteps.py::test_device_path_times_each_rank_by_its_own_clock"),
    "37.4": ("a fractional-GPU slice computes on the CPU", "distributed_maml/execution/actor.py",
             "    if gpus <= 0:\n        return \"cpu\"", "    if gpus < 1:\n        return \"cpu\"",
             "tests/test_gpu_decisions.py::test_a_slice_with_any_share_of_a_gpu_computes_on_it"),
    "37.5": ("fp32 leaves TF32 on (the switches set for tf32 only)", "distributed_maml/core/precision.py",
             "    if device.type == \"cuda\":\n", "    if device.type == \"cuda\" and precision == \"tf32\":\n",
             "tests/test_gpu_decisions.py::test_a_cuda_run_sets_the_tf32_switches_its_precision_asks_for"),
    "37.6": ("a loosened check of a new key (shards_per_worker = 0 passes)", "distributed_maml/config/scaling.py",
             "self.shards_per_worker >= 1,", "self.shards_per_worker >= 0,",
             "tests/test_config.py::test_bad_scaling_values_are_one_whole_line"),
    # issue 43: the way out and episodes
    "1": ("adapting fewer classes than outputs: the mask off by one", "distributed_maml/use/metamodel.py",
          'mask[ways:] = float("-inf")', 'mask[ways + 1 :] = float("-inf")',
          "tests/test_guards.py::test_adapting_fewer_classes_than_outputs_is_the_training_loop_on_its_padded_episode"),
    "2": ("the test-time inner loop takes step 0's learned size", "distributed_maml/core/adaptation.py",
          "first_step=step - 1)", "first_step=0)",
          "tests/test_guards.py::test_learned_per_step_sizes_take_each_step_s_own_size"),
    "3": ("export --checkpoint step_N writes the default checkpoint", "distributed_maml/use/export.py",
          "checkpoint.resolve(run_dir, which)", "checkpoint.resolve(run_dir, None)",
          "tests/test_guards.py::test_export_of_a_named_checkpoint_holds_that_checkpoint_and_no_local_path"),
    "4a": ("the served cache turned first-in first-out", "distributed_maml/use/adaptbatch.py",
           "        if entry is not None:\n            self._entries.move_to_end(task_id)\n", "",
           "tests/test_guards.py::test_the_task_cache_is_least_recently_used_against_a_written_out_one"),
    "4b": ("a request's steps ignored", "distributed_maml/use/adaptbatch.py",
           "meta.adapt_many(tasks, steps)", "meta.adapt_many(tasks, None)",
           "tests/test_guards.py::test_a_request_s_steps_are_the_steps_it_adapts_with_and_a_cached_answer_is_fresh_bits"),
    "4c": ("a size limit refuses a request at exactly its limit", "distributed_maml/use/adaptrequest.py",
           "len(x) > most", "len(x) >= most",
           "tests/test_guards.py::test_a_request_at_each_limit_is_accepted_and_one_past_it_refused"),
    "5": ("a capped episode's class gets no support example", "distributed_maml/data/episodes.py",
          "shots = 1 + (shots - 1) * (spec.max_support - ways) // (total - ways)",
          "shots = shots * spec.max_support // total",
          "tests/test_guards.py::test_a_capped_episode_gives_every_class_support_and_keeps_the_cap"),
    "5b": ("the cap overshot (the draw before issue 43)", "distributed_maml/data/episodes.py",
           "shots = 1 + (shots - 1) * (spec.max_support - ways) // (total - ways)",
           "shots = np.maximum(1, shots * spec.max_support // total)",
           "tests/test_guards.py::test_a_capped_shape_keeps_the_cap_and_a_shot_per_class"),
    "6": ("a step straddling two epochs draws both parts from the first", "distributed_maml/data/sampler.py",
          "keyed_permutation(offset_of[mask], self.num_tasks, self.seed, e)",
          "keyed_permutation(offset_of[mask], self.num_tasks, self.seed, first_epoch)",
          "tests/test_guards.py::test_keyed_epochs_are_bijections_whatever_the_batch_and_the_step"),
    "7": ("eval's groups report every task's numbers", "distributed_maml/evaluation/evaltable.py",
          "**summarize(losses[m], None if accs is None else accs[m], steps, bound)",
          "**summarize(losses, accs, steps, bound)",
          "tests/test_guards.py::test_each_group_s_numbers_are_its_own_tasks"),
    # issue 44: the per-task loop computes no padding
    "8": ("the loop of one graph at a time computes the padding", "distributed_maml/core/maml.py",
          "per_task(params, *task_of(batch.tensors(), i))", "per_task(params, *(t[i] for t in batch.tensors()))",
          "tests/test_episodes.py::test_the_loop_computes_no_padding_for_any_algorithm"),
    # issue 45: heads of any number of classes
    "45.1": ("unicorn's copies cut from the shared row (its gradient lost)", "distributed_maml/core/heads.py",
             "p[self.weight].expand(rows, self.features)", "p[self.weight].detach().expand(rows, self.features)",
             "tests/test_heads.py::test_the_start_s_gradient_is_the_sum_over_the_copies"),
    "45.2": ("proto's bias +||c||^2", "distributed_maml/core/heads.py",
             "out[self.bias] = -centres.square().sum(-1)", "out[self.bias] = centres.square().sum(-1)",
             "tests/test_heads.py::test_a_mixed_batch_s_meta_gradient_is_the_written_out_per_task_loop"),
    "45.3": ("proto's prototypes count padded examples", "distributed_maml/core/heads.py",
             "onehot = onehot * example_weight(ys).to(features.dtype).unsqueeze(-1)", "onehot = onehot * 1.0",
             "tests/test_heads.py::test_a_mixed_batch_s_meta_gradient_is_the_written_out_per_task_loop"),
    "45.4": ("a task's own number of classes ignored at adaptation", "distributed_maml/core/heads.py",
             "rows = self.width if width is None else width", "rows = self.width",
             "tests/test_onthefly.py::test_a_run_of_3_to_5_ways_adapts_a_12_way_task_by_every_path_and_renaming_renames"),
    "45.5": ("--permutations relabels the support set only", "distributed_maml/evaluation/permutations.py",
             '        for key in ("y_support", "y_query"):\n            labels', '        for key in ("y_support",):\n            labels',
             "tests/test_onthefly.py::test_a_relabelling_is_a_permutation_of_each_task_s_own_classes"),
    "45.6": ("the meta-dataset ways stop one short of the classes there are", "distributed_maml/data/metadataset.py",
             "min(ways[1], n) + 1)", "min(ways[1], n))",
             "tests/test_metadataset.py::test_ways_and_the_support_budget_are_uniform_at_a_fixed_seed"),
    "45.7": ("the queries from a third of the smallest class, not half", "distributed_maml/data/metadataset.py",
             "int(have.min()) // 2)", "int(have.min()) // 3)",
             "tests/test_metadataset.py::test_every_episode_is_the_paper_s_definition_and_its_examples_are_its_classes"),
    "45.8": ("the support budget ignores the cap", "distributed_maml/data/metadataset.py",
             "        size = min(size, budget)", "        size = max(size, budget)",
             "tests/test_metadataset.py::test_the_boundaries_two_examples_a_class_and_fewer_classes_than_ways"),
    "45.9": ("the class shares ignore the classes' sizes", "distributed_maml/data/metadataset.py",
             "share = have * np.exp(", "share = 1 + 0 * have * np.exp(",
             "tests/test_metadataset.py::test_imbalance_follows_class_size"),
    "45.10": ("a class's shots not capped by its examples left after the queries", "distributed_maml/data/metadataset.py",
             ".astype(np.int64) + 1, left)", ".astype(np.int64) + 1, left + 1)",
             "tests/test_metadataset.py::test_every_episode_is_the_paper_s_definition_and_its_examples_are_its_classes"),
    "45.11": ("a unicorn run's baselines evaluated in the network's layout, not the run's", "distributed_maml/evaluation/evaluate.py",
             "inits.update({name: net.task_head.meta_params(w) for name, w in own.items()})", "inits.update(own)",
             "tests/test_onthefly.py::test_a_head_run_is_evaluated_beside_both_baselines"),
    "45.12": ("proto's one-pass first inner gradient total (through the prototypes), not partial", "distributed_maml/core/heads.py",
             "torch.func.grad(head_loss, argnums=(0, 1))(features, rows)",
             "torch.func.grad(lambda f, r: head_loss(f, {**r, **self.rows_of(f, ys, self.width)}), argnums=(0, 1))(features, rows)",
             "tests/test_heads.py::test_proto_s_one_pass_start_is_the_written_out_loop_by_either_features_and_task_map"),
    "45.13": ("proto's features by the body without a padded set's BatchNorm masks", "distributed_maml/core/heads.py",
             "fwd = bind(body, ys)", "fwd = body",
             "tests/test_heads.py::test_a_mixed_batch_s_meta_gradient_is_the_written_out_per_task_loop"),
    "45.14": ("a network that changes its outputs after its head let through to unicorn or proto", "distributed_maml/core/heads.py",
             "if features.shape != (4, head.features) or not torch.allclose(out, want, rtol=1e-4, atol=1e-5):",
             "if features.shape != (4, head.features):",
             "tests/test_heads.py::test_proto_s_features_are_the_head_s_input_and_a_network_that_changes_its_outputs_is_one_line"),
    "45.15": ("proto's start back to two passes over the support set (the one-pass first step unused)", "distributed_maml/core/heads.py",
             "    if head is None or head.kind != \"proto\" or head.own_rows(p):",
             "    if True:",
             "tests/test_heads.py::test_proto_s_first_inner_step_runs_the_network_over_the_support_set_once"),
    "45.16": ("eval --permutations adapting every weight of an ANIL run (the run's head unused)", "distributed_maml/evaluation/permutations.py",
             "computer.task_map, computer.head, computer.proximal,", "computer.task_map, None, computer.proximal,",
             "tests/test_onthefly.py::test_eval_permutations_adapts_as_the_run_does"),
    "45.17": ("a fixed-shape task relabelled as if padded (its labels' second column read as ways)", "distributed_maml/evaluation/permutations.py",
             "if padded else ways", "if True else ways",
             "tests/test_onthefly.py::test_a_relabelling_of_fixed_shape_tasks_maps_each_through_a_permutation_of_the_ways"),
}  # fmt: skip


def check(kind: str) -> str:
    what, module, good, bad, test = BUGS[kind]
    path = REPO / module
    src = path.read_text()
    if src.count(good) != 1:
        return f"{kind:>4}  not applied: {module} no longer holds its line once ({what})"
    path.write_text(src.replace(good, bad))
    try:
        proc = subprocess.run(
            # The default tier's markers (pyproject addopts): a test moved out of it is "NOT CAUGHT".
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
    finally:
        path.write_text(src)
    failed = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("FAILED")]
    verdict = f"caught by {len(failed)} failing test(s)" if proc.returncode == 1 and failed else "NOT CAUGHT"
    return f"{kind:>4}  {verdict}: {what} ({test.split('::')[-1]})"


def main(argv: list[str]) -> int:
    kinds = argv or list(BUGS)
    unknown = [k for k in kinds if k not in BUGS]
    if unknown:
        print(f"handmade: no kind {', '.join(unknown)}; kinds: {', '.join(BUGS)}", file=sys.stderr)
        return 2
    lines = [check(k) for k in kinds]
    print("\n".join(lines))
    return 0 if all("caught by" in line for line in lines) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
