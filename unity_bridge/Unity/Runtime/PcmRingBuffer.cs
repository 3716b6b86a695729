// PcmRingBuffer: a thread-safe mono PCM ring buffer that resamples (linear) to the audio device rate when read.
using System;

namespace NpcVoice
{
    /// <summary>
    /// The network thread writes s16le PCM at the server's rate; the audio thread (Unity's OnAudioFilterRead) reads
    /// interleaved float frames at the output rate. The buffer grows as needed (the server streams faster than real
    /// time) up to <see cref="MaxSamples"/>, beyond which the oldest audio is dropped. The lock is held only for a
    /// copy, never across I/O.
    /// </summary>
    public sealed class PcmRingBuffer
    {
        readonly object gate = new object();
        float[] buf;
        int head;      // index of the oldest unread sample
        int count;     // unread samples
        double frac;   // read position between buf[head] and the next sample, in source samples
        int sourceRate;
        bool complete; // no more audio will come: the last sample may be read without a right neighbour
        long played;   // source samples consumed since Clear

        public PcmRingBuffer(int initialCapacity = 48000, int maxSamples = 48000 * 600)
        {
            if (initialCapacity < 2) throw new ArgumentOutOfRangeException("initialCapacity");
            buf = new float[initialCapacity];
            MaxSamples = Math.Max(maxSamples, initialCapacity);
            sourceRate = 16000;
        }

        public int MaxSamples { get; private set; }

        /// <summary>Samples dropped because the buffer was full.</summary>
        public long Dropped { get; private set; }

        /// <summary>Source samples played (read or dropped) since the last Clear: the answer's play position.</summary>
        public long Played { get { lock (gate) return played; } }

        /// <summary>The play position in seconds (what lip-sync timings are measured against).</summary>
        public double PlayedSeconds { get { lock (gate) return played / (double)sourceRate; } }

        /// <summary>Unread samples at the source rate.</summary>
        public int Count { get { lock (gate) return count; } }

        /// <summary>Unread audio in seconds.</summary>
        public double BufferedSeconds { get { lock (gate) return count / (double)sourceRate; } }

        /// <summary>The sample rate of what is written (the server's audio frames carry it).</summary>
        public int SourceRate
        {
            get { lock (gate) return sourceRate; }
            set
            {
                if (value <= 0) throw new ArgumentOutOfRangeException("value", "sample rate must be positive");
                lock (gate) sourceRate = value;
            }
        }

        public void Clear()
        {
            lock (gate) { head = 0; count = 0; frac = 0; complete = false; played = 0; }
        }

        /// <summary>The answer's audio is all written: let Read play out the very last sample too.</summary>
        public void Complete()
        {
            lock (gate) complete = true;
        }

        /// <summary>Append little-endian signed 16-bit mono PCM.</summary>
        public void WritePcm16(byte[] pcm, int offset, int bytes)
        {
            if (pcm == null) throw new ArgumentNullException("pcm");
            if ((bytes & 1) != 0) throw new ArgumentException("s16le PCM needs an even number of bytes");
            int n = bytes / 2;
            var tmp = new float[n];
            for (int i = 0; i < n; i++)
            {
                short s = (short)(pcm[offset + 2 * i] | (pcm[offset + 2 * i + 1] << 8));
                tmp[i] = s / 32768f;
            }
            Write(tmp, 0, n);
        }

        /// <summary>Append float mono samples in [-1, 1].</summary>
        public void Write(float[] samples, int offset, int n)
        {
            lock (gate)
            {
                complete = false;
                if (count + n > buf.Length) Grow(count + n);
                if (n > buf.Length)  // more than the maximum at once: keep the newest
                {
                    offset += n - buf.Length;
                    Dropped += n - buf.Length;
                    played += n - buf.Length;
                    n = buf.Length;
                }
                int overflow = count + n - buf.Length;
                if (overflow > 0)
                {
                    head = (head + overflow) % buf.Length;
                    count -= overflow;
                    Dropped += overflow;
                    played += overflow;
                }
                int tail = (head + count) % buf.Length;
                int first = Math.Min(n, buf.Length - tail);
                Array.Copy(samples, offset, buf, tail, first);
                Array.Copy(samples, offset + first, buf, 0, n - first);
                count += n;
            }
        }

        void Grow(int needed)
        {
            int size = buf.Length;
            while (size < needed && size < MaxSamples) size = (int)Math.Min((long)size * 2, MaxSamples);
            if (size == buf.Length) return;
            var nb = new float[size];
            int first = Math.Min(count, buf.Length - head);
            Array.Copy(buf, head, nb, 0, first);
            Array.Copy(buf, 0, nb, first, count - first);
            buf = nb;
            head = 0;
        }

        /// <summary>
        /// Fill <paramref name="frames"/> interleaved frames of <paramref name="channels"/> channels at
        /// <paramref name="outputRate"/> (mono copied to every channel), linearly interpolating between source
        /// samples. Frames with no audio left are set to silence. Returns the frames that carried audio.
        /// </summary>
        public int Read(float[] dst, int frames, int channels, int outputRate)
        {
            if (channels < 1) throw new ArgumentOutOfRangeException("channels");
            if (outputRate <= 0) throw new ArgumentOutOfRangeException("outputRate");
            int produced = 0;
            lock (gate)
            {
                double step = sourceRate / (double)outputRate;
                double pos = frac;
                int len = buf.Length;
                while (produced < frames)
                {
                    int i = (int)pos;
                    if (i >= count || (i + 1 >= count && !complete)) break;  // need both neighbours until the end
                    float a = buf[(head + i) % len];
                    float b = i + 1 < count ? buf[(head + i + 1) % len] : a;
                    float t = (float)(pos - i);
                    float v = a + (b - a) * t;
                    int o = produced * channels;
                    for (int c = 0; c < channels; c++) dst[o + c] = v;
                    produced++;
                    pos += step;
                }
                int consumed = Math.Min((int)pos, count);
                head = (head + consumed) % len;
                count -= consumed;
                played += consumed;
                frac = pos - consumed;
                if (count == 0) frac = 0;
            }
            Array.Clear(dst, produced * channels, (frames - produced) * channels);
            return produced;
        }
    }
}
