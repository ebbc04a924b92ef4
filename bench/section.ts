/** What a bench section is (bench/sections/*.ts) and the options bench/run.ts runs it with. */

export interface BenchOptions {
  /** Timed runs of each command (the table shows their median, min and max). */
  runs: number;
  /** Bytes in the generated image. */
  imageSize: number;
  log: (line: string) => void;
}

export interface Section {
  name: string;
  description: string;
  /** Run when no section is named. */
  default: boolean;
  run(options: BenchOptions): Promise<void>;
}
