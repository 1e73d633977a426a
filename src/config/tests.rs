//! Loading the real config files, overrides, errors and the YAML round trip.

use super::*;

fn load(base: &str, overrides: &[&str]) -> Result<RunConfig, ConfigError> {
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    RunConfig::load(ConfigSource::builtin(base)?, &overrides)
}

fn text(yaml: &str) -> ConfigSource {
    ConfigSource::Text {
        origin: "test.yaml".into(),
        text: yaml.into(),
    }
}

#[test]
fn cfg_pretrain_has_the_reference_values() {
    let c = load("cfg_pretrain", &[]).unwrap();
    assert_eq!(c.arch_name, TRM_ARCH_NAME);
    assert_eq!(c.loss, LossConfig::default());
    assert_eq!(c.loss.loss_type, LossType::StablemaxCrossEntropy);
    assert_eq!(c.arch.hidden_size, 512);
    assert_eq!(c.arch.num_heads, 8);
    assert_eq!(
        (c.arch.h_cycles, c.arch.l_cycles, c.arch.l_layers),
        (3, 6, 2)
    );
    assert_eq!(c.arch.puzzle_emb_ndim, 512, "${{.hidden_size}} resolved");
    assert_eq!(c.arch.puzzle_emb_len, 16);
    assert_eq!(c.arch.halt_max_steps, 16);
    assert_eq!(c.arch.halt_exploration_prob, 0.1);
    assert_eq!(c.arch.forward_dtype, "bfloat16");
    assert!(c.arch.no_act_continue && !c.arch.mlp_t);
    assert_eq!(
        (c.arch.seq_len, c.arch.vocab_size),
        (0, 0),
        "dataset fields unset"
    );
    assert_eq!(c.data_paths, [PathBuf::from("data/arc-aug-1000")]);
    assert!(c.data_paths_test.is_empty());
    assert_eq!(c.evaluators.len(), 1);
    assert_eq!(c.evaluators[0].name, ARC_EVALUATOR_NAME);
    assert_eq!(c.global_batch_size, 768);
    assert_eq!(c.epochs, 100_000);
    assert_eq!(c.eval_interval, Some(10_000));
    assert!(c.checkpoint_every_eval);
    assert_eq!(c.lr, 1e-4);
    assert_eq!(c.lr_min_ratio, 1.0);
    assert_eq!(c.lr_warmup_steps, 2000);
    assert_eq!((c.beta1, c.beta2, c.weight_decay), (0.9, 0.95, 0.1));
    assert_eq!((c.puzzle_emb_lr, c.puzzle_emb_weight_decay), (1e-2, 0.1));
    assert_eq!((c.seed, c.min_eval_interval), (0, 0));
    assert!(!c.ema && !c.freeze_weights);
    assert_eq!(c.ema_rate, 0.999);
    assert_eq!(
        (c.project_name.as_deref(), c.run_name.as_deref()),
        (None, None)
    );
    assert_eq!(
        (c.checkpoint_path.as_deref(), c.load_checkpoint.as_deref()),
        (None, None)
    );
    assert_eq!(
        (c.checkpoint_keep_last, c.threads, c.backend),
        (10, 0, Backend::Cpu)
    );
    assert_eq!((c.epochs_per_iter(), c.total_iters()), (10_000, 10));
}

#[test]
fn cpu_tiny_is_small() {
    let c = load("cpu-tiny", &[]).unwrap();
    assert_eq!((c.arch.hidden_size, c.arch.num_heads), (64, 2));
    assert_eq!(
        (c.arch.l_layers, c.arch.h_cycles, c.arch.l_cycles),
        (2, 2, 2)
    );
    assert_eq!(c.arch.halt_max_steps, 4);
    assert_eq!((c.arch.puzzle_emb_ndim, c.arch.puzzle_emb_len), (64, 1));
    assert_eq!(c.arch.forward_dtype, "float32");
    assert_eq!(c.global_batch_size, 32);
    assert_eq!(c.epochs % c.epochs_per_iter(), 0);
    let arch = c.arch_for_dataset(900, 12, 961).unwrap();
    assert_eq!(arch.total_seq_len(), 901);
    assert_eq!(arch.intermediate_size(), 256);
}

#[test]
fn overrides_apply_in_order() {
    let c = load(
        "cfg_pretrain",
        &[
            "+run_name=x",
            "arch.L_cycles=4",
            "ema=True",
            "data_paths=[a,b]",
            "lr=3e-4",
            "arch.hidden_size=256",
            "arch.num_heads=4",
            "eval_interval=None",
            "arch.loss.loss_type=softmax_cross_entropy",
            "++checkpoint_path=ck/run",
            "lr=5e-4",
        ],
    )
    .unwrap();
    assert_eq!(c.run_name.as_deref(), Some("x"));
    assert_eq!(c.arch.l_cycles, 4);
    assert!(c.ema);
    assert_eq!(c.data_paths, [PathBuf::from("a"), PathBuf::from("b")]);
    assert_eq!(c.lr, 5e-4, "the later override wins");
    assert_eq!(c.arch.hidden_size, 256);
    assert_eq!(
        c.arch.puzzle_emb_ndim, 256,
        "the reference follows the override"
    );
    assert_eq!(c.eval_interval, None);
    assert_eq!(c.total_iters(), 1);
    assert_eq!(c.loss.loss_type, LossType::SoftmaxCrossEntropy);
    assert_eq!(c.checkpoint_path, Some(PathBuf::from("ck/run")));
    // Untouched keys keep the file's values.
    assert_eq!(c.arch.h_cycles, 3);
    assert_eq!(c.global_batch_size, 768);
    // Numeric names stay names.
    let c = load("cpu-tiny", &["run_name=2024", "project_name=True"]).unwrap();
    assert_eq!(c.run_name.as_deref(), Some("2024"));
    assert_eq!(c.project_name.as_deref(), Some("True"));
}

#[test]
fn typo_names_the_key_and_the_nearest_one() {
    let err = load("cpu-tiny", &["arch.L_cycle=4"]).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(&err, ConfigError::UnknownKey { key, hint, .. }
            if key == "arch.L_cycle" && hint == "did you mean `arch.L_cycles`?"),
        "{msg}"
    );
    assert!(msg.contains("override `arch.L_cycle=4`"), "{msg}");
    let msg = load("cpu-tiny", &["global_bach_size=8"])
        .unwrap_err()
        .to_string();
    assert!(msg.contains("did you mean `global_batch_size`?"), "{msg}");
    // In a file too, with the file named.
    let yaml = BUILTIN_CONFIGS[1]
        .1
        .replace("  L_layers: 2", "  L_layer: 2");
    let msg = RunConfig::load(text(&yaml), &[]).unwrap_err().to_string();
    assert!(msg.contains("`arch.L_layer` in test.yaml"), "{msg}");
    assert!(msg.contains("did you mean `arch.L_layers`?"), "{msg}");
    // A key inside a mapping given as a value.
    let msg = load(
        "cpu-tiny",
        &["arch.loss={name: losses@ACTLossHead, los_type: x}"],
    )
    .unwrap_err()
    .to_string();
    assert!(msg.contains("`arch.loss.los_type`"), "{msg}");
}

#[test]
fn wrong_types_name_the_key() {
    let err = load("cpu-tiny", &["epochs=abc"]).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(&err, ConfigError::Value { key, .. } if key == "epochs"),
        "{msg}"
    );
    assert!(msg.contains("`epochs`") && msg.contains("abc"), "{msg}");
    let err = load("cpu-tiny", &["arch.L_cycles=two"]).unwrap_err();
    assert!(
        matches!(&err, ConfigError::Value { key, .. } if key == "arch.L_cycles"),
        "{err}"
    );
    let err = load("cpu-tiny", &["arch.loss.loss_type=mse"]).unwrap_err();
    assert!(
        matches!(&err, ConfigError::Value { key, .. } if key == "arch.loss.loss_type"),
        "{err}"
    );
    let err = load("cpu-tiny", &["ema=maybe"]).unwrap_err();
    assert!(
        matches!(&err, ConfigError::Value { key, .. } if key == "ema"),
        "{err}"
    );
    let err = load("cpu-tiny", &["data_paths=[[a]]"]).unwrap_err();
    assert!(
        matches!(&err, ConfigError::Value { key, .. } if key == "data_paths[0]"),
        "{err}"
    );
    let err = load("cpu-tiny", &["lr.x=1"]).unwrap_err();
    assert!(matches!(&err, ConfigError::BadOverride { .. }), "{err}");
    let err = load("cpu-tiny", &["lr"]).unwrap_err();
    assert!(err.to_string().contains("expected key=value"), "{err}");
}

#[test]
fn missing_required_keys_are_named() {
    let yaml = BUILTIN_CONFIGS[1].1.replace("\nlr: 1e-3\n", "\n");
    let err = RunConfig::load(text(&yaml), &[]).unwrap_err();
    assert!(
        matches!(&err, ConfigError::Value { key, .. } if key == "lr"),
        "{err}"
    );
    let yaml = BUILTIN_CONFIGS[1]
        .1
        .replace("    loss_type: stablemax_cross_entropy\n", "");
    let err = RunConfig::load(text(&yaml), &[]).unwrap_err();
    assert!(
        matches!(&err, ConfigError::Value { key, .. } if key == "arch.loss.loss_type"),
        "{err}"
    );
}

#[test]
fn eval_interval_must_divide_epochs() {
    let err = load("cpu-tiny", &["epochs=20", "eval_interval=3"]).unwrap_err();
    assert!(
        matches!(
            err,
            ConfigError::EvalIntervalNotDivisor {
                eval_interval: 3,
                epochs: 20
            }
        ),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("eval_interval 3") && msg.contains("epochs 20"),
        "{msg}"
    );
    load("cpu-tiny", &["epochs=21", "eval_interval=7"]).unwrap();
}

#[test]
fn other_validation_errors() {
    for (ov, key) in [
        ("global_batch_size=0", "global_batch_size"),
        ("epochs=0", "epochs"),
        ("data_paths=[]", "data_paths"),
        ("beta2=1.0", "beta2"),
        ("lr=-1", "lr"),
        ("lr_min_ratio=1.5", "lr_min_ratio"),
    ] {
        let err = load("cpu-tiny", &[ov]).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Invalid { key: k, .. } if k == key),
            "{ov}: {err}"
        );
    }
    let err = load("cpu-tiny", &["arch.num_heads=3"]).unwrap_err();
    assert!(matches!(err, ConfigError::Arch(_)), "{err}");
    let err = load(
        "cpu-tiny",
        &["arch.name=recursive_reasoning.hrm@HierarchicalReasoningModel_ACTV1"],
    )
    .unwrap_err();
    assert!(
        matches!(&err, ConfigError::Unsupported { key, .. } if key == "arch.name"),
        "{err}"
    );
    let err = load("cpu-tiny", &["evaluators=[{name: sudoku}]"]).unwrap_err();
    assert!(
        matches!(&err, ConfigError::Unsupported { key, .. } if key == "evaluators[0].name"),
        "{err}"
    );
}

#[test]
fn to_yaml_round_trips() {
    for name in ["cfg_pretrain", "cpu-tiny"] {
        let c = load(
            name,
            &[
                "+run_name=x",
                "ema=True",
                "evaluators=[{name: arc@ARC, submission_K: 2, pass_Ks: [1, 2]}]",
                "load_checkpoint=ck/step_5",
            ],
        )
        .unwrap();
        let yaml = c.to_yaml().unwrap();
        let back = RunConfig::load(text(&yaml), &[]).unwrap();
        assert_eq!(back, c, "{name}:\n{yaml}");
        assert!(
            yaml.starts_with("arch:\n  name: recursive_reasoning.trm@"),
            "{yaml}"
        );
        assert!(yaml.contains("  L_cycles: "), "{yaml}");
        assert!(yaml.contains("\nrun_name: x\n"), "{yaml}");
        assert!(
            !yaml.contains("seq_len"),
            "unset dataset fields are left out:\n{yaml}"
        );
    }
    // Once the dataset filled them they are written and read back.
    let mut c = load("cpu-tiny", &[]).unwrap();
    c.arch = c.arch_for_dataset(900, 12, 961).unwrap();
    let back = RunConfig::load(text(&c.to_yaml().unwrap()), &[]).unwrap();
    assert_eq!(back.arch.seq_len, 900);
    assert_eq!(back, c);
}

#[test]
fn top_keys_match_the_struct() {
    let c = load("cpu-tiny", &[]).unwrap();
    let Value::Mapping(map) = serde_norway::from_str(&c.to_yaml().unwrap()).unwrap() else {
        panic!("to_yaml writes a mapping");
    };
    let written: Vec<&str> = map.keys().filter_map(|k| k.as_str()).collect();
    assert_eq!(written, keys::TOP_KEYS);
}

#[test]
fn dataset_fields_must_agree() {
    let c = load("cpu-tiny", &["arch.seq_len=400"]).unwrap();
    let err = c.arch_for_dataset(900, 12, 10).unwrap_err();
    assert!(
        matches!(
            err,
            ConfigError::DatasetMismatch {
                field: "seq_len",
                config: 400,
                dataset: 900
            }
        ),
        "{err}"
    );
}

#[test]
fn schedule_numbers() {
    let c = load("cfg_pretrain", &[]).unwrap();
    // ARC-AGI-1 with 1000 augmentations: 960 groups, 3.56 examples per puzzle.
    let s = Schedule::new(&c, 960, 3.5625);
    // 100000 * 960 * 3.5625 / 768 = 445312.5 -> 445312
    assert_eq!(s.total_steps, 445_312);
    // 10000 * 960 * 3.5625 / 768 = 44531.25 -> 44531
    assert_eq!(s.steps_per_iter, 44_531);
    assert_eq!((s.total_iters, s.epochs_per_iter), (10, 10_000));
    assert_eq!(s.lr.warmup_steps, 2000);
    assert_eq!(s.lr_at(1000), 5e-5);
    assert_eq!(s.lr_at(2000), 1e-4);
    assert_eq!(s.lr_at(400_000), 1e-4, "lr_min_ratio 1: flat after warm-up");
    assert_eq!(s.puzzle_emb_lr_at(1000), 5e-3);
    assert!(s.evaluates_after(0));
    let shown = s.to_string();
    assert!(shown.contains("445312 steps in all"), "{shown}");
    assert!(shown.contains("warm-up 2000 steps"), "{shown}");

    let c = load(
        "cpu-tiny",
        &[
            "epochs=10",
            "eval_interval=5",
            "lr_warmup_steps=0",
            "min_eval_interval=1",
        ],
    )
    .unwrap();
    let s = Schedule::new(&c, 48, 3.5);
    // 10 * 48 * 3.5 / 32 = 52.5 -> 52
    assert_eq!(s.total_steps, 52);
    assert_eq!(s.steps_per_iter, 26);
    assert_eq!(s.lr_at(0), 1e-3);
    // step == total: cosine at its end, lr_min_ratio 0.1 of 1e-3
    assert!((s.lr_at(52) - 1e-4).abs() < 1e-18);
    assert!(!s.evaluates_after(0) && s.evaluates_after(1));
}
